"""The server's progress.png: nnU-Net's three panels (losses and pseudo Dice, round time, learning rate), with
one pseudo-Dice curve per site next to the pooled one."""
import os
from typing import Dict, List

import matplotlib

matplotlib.use('agg')
import matplotlib.pyplot as plt  # noqa: E402


def plot_federated_progress(values: Dict[str, list], site_dice: Dict[str, List[float]], output_folder: str):
    n = min(len(v) for k, v in values.items() if k in ('train_losses', 'val_losses', 'mean_fg_dice', 'lrs'))
    if n == 0:
        return
    x = list(range(n))
    fig, axes = plt.subplots(3, 1, figsize=(16, 24))
    ax = axes[0]
    ax.plot(x, values['train_losses'][:n], color='b', ls='-', label='loss_tr (sites, weighted)', linewidth=3)
    ax.plot(x, values['val_losses'][:n], color='r', ls='-', label='loss_val (sites, weighted)', linewidth=3)
    ax.set_xlabel('round')
    ax.set_ylabel('loss')
    ax2 = ax.twinx()
    ax2.plot(x, values['mean_fg_dice'][:n], color='g', ls='dotted', label='pseudo dice (pooled)', linewidth=3)
    ax2.plot(x, values['ema_fg_dice'][:n], color='g', ls='-', label='pseudo dice (pooled, mov. avg.)', linewidth=4)
    for site, curve in sorted(site_dice.items()):
        ax2.plot(list(range(len(curve[:n]))), curve[:n], ls='--', linewidth=1.5, label=f'pseudo dice site {site}')
    ax2.set_ylabel('pseudo dice (of the model the sites received)')
    ax.legend(loc=(0, 1))
    ax2.legend(loc=(0.35, 1), ncol=2)

    ax = axes[1]
    durations = [e - s for s, e in zip(values['epoch_start_timestamps'][:n], values['epoch_end_timestamps'][:n])]
    ax.plot(list(range(len(durations))), durations, color='b', label='round duration', linewidth=3)
    ax.set_ylim(bottom=0)
    ax.set_xlabel('round')
    ax.set_ylabel('time [s]')
    ax.legend(loc=(0, 1))

    ax = axes[2]
    ax.plot(x, values['lrs'][:n], color='b', label='learning rate', linewidth=3)
    ax.set_xlabel('round')
    ax.set_ylabel('learning rate')
    ax.legend(loc=(0, 1))
    plt.tight_layout()
    tmp = os.path.join(output_folder, 'progress.partial.png')
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, os.path.join(output_folder, 'progress.png'))
