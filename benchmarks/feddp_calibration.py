"""How strongly FedDP's inter-site guided calibration acts in a trained run: per site, the disagreement U of the
sites' final models on the site's own training patches and the IGC term against nnU-Net's loss. One run.

    python benchmarks/feddp_calibration.py -d 501 [-c 3d_fullres] [-p nnUNetCPUPlans] [--batches 5]

Reads a finished ``--method feddp`` run (its sites' state files hold the frozen reference and every site's
queries) and prints, per site: U's mean and the share of voxels with U > 0.5 (U is divided by its maximum per
case, so its maximum is 1 wherever the sites' models disagree at all), and the ratio IGC term / nnU-Net's loss.
"""
import argparse
import os

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-d', required=True)
    p.add_argument('-c', default='3d_fullres')
    p.add_argument('-p', default='nnUNetCPUPlans')
    p.add_argument('--batches', type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault('nnUNet_n_proc_DA', '0')

    from fednnunet.engines.simulation import SimulationEngine
    from fednnunet.federation import Federation
    from fednnunet.site_training import started_trainer
    from fednnunet.trainers.feddp import igc_term
    from fednnunet.training_server import SERVER_CHECKPOINT, FederatedTraining, TrainingConfig

    federation = Federation.from_raw(args.d)
    engine = SimulationEngine.for_federation(federation, 1, device='cpu')
    config = TrainingConfig(federation.dataset_name, args.c, 0, 'feddp', args.p)
    training = FederatedTraining(engine, config)
    checkpoint = torch.load(os.path.join(training.output_folder, SERVER_CHECKPOINT), map_location='cpu',
                            weights_only=True)
    saved = checkpoint['config']
    training.config = TrainingConfig(**{k: saved[k] for k in saved})
    training.site_indices, training.run_id = checkpoint['site_indices'], checkpoint['run_id']
    rounds = saved['rounds']
    print(f"{federation.dataset_name}: FedDP run {training.run_id[:8]}, {rounds} rounds, stage 2 = last "
          f"{saved['hyperparameters']['stage2_rounds']}")
    print('site  U mean  U>0.5   IGC term / nnU-Net loss')
    for site, worker in engine.workers.items():
        trainer, rounds_done = started_trainer(worker, training.site_config(site, round=rounds - 1), rounds - 1)
        assert trainer.reference is not None, f'site {site} has no reference state (stage 2 did not run?)'
        torch.manual_seed(0)
        u_mean, u_high, ratios = [], [], []
        trainer.network.train()
        for _ in range(args.batches):
            batch = next(trainer.dataloader_train)
            with torch.no_grad():
                out = trainer.network(batch['data'])
                u = trainer.disagreement(batch['data'])
                base = trainer.loss.loss(out, batch['target']).item()
                term = igc_term(out[0], batch['target'][0], u, trainer.igc_lambda).item()
            u_mean.append(u.mean().item())
            u_high.append((u > 0.5).float().mean().item())
            ratios.append(term / abs(base))
        print(f'{site:<5} {np.mean(u_mean):.4f}  {np.mean(u_high):.4f}  {np.mean(ratios):.4f}')
        trainer.close()


if __name__ == '__main__':
    main()
