"""The server's plots: nnU-Net's own progress.png (from the server's nnU-Net logger: site-weighted losses, pooled
pseudo Dice, round time, learning rate) and progress_sites.png, one pseudo-Dice curve per site next to the pooled
one."""
import os
from typing import Dict, List

import matplotlib

matplotlib.use('agg')
import matplotlib.pyplot as plt  # noqa: E402


def plot_federated_progress(logger, site_dice: Dict[str, List[float]], output_folder: str):
    """``logger``: the server's nnU-Net MetaLogger; ``site_dice``: each site's pseudo Dice per round."""
    logger.plot_progress_png(output_folder)
    fig = sites_figure(logger.local_logger.my_fantastic_logging['mean_fg_dice'], site_dice)
    tmp = os.path.join(output_folder, 'progress_sites.partial.png')
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, os.path.join(output_folder, 'progress_sites.png'))


def sites_figure(pooled_dice: List[float], site_dice: Dict[str, List[float]]):
    """The pooled pseudo Dice and one curve per site, in nnU-Net's plot style."""
    fig, ax = plt.subplots(figsize=(12, 7))
    pooled = {'mean_fg_dice': pooled_dice}
    ax.plot(range(len(pooled['mean_fg_dice'])), pooled['mean_fg_dice'], color='k', linewidth=3,
            label='pooled (exact, over all sites)')
    for site, curve in sorted(site_dice.items()):
        ax.plot(range(len(curve)), curve, ls='--', linewidth=1.5, label=f'site {site}')
    ax.set_xlabel('round')
    ax.set_ylabel('pseudo Dice')  # nnU-Net's plot style (large fonts, set by its logger) stays: a short label fits
    ax.set_title('validation of the model each site received', fontsize='medium')
    ax.legend(loc='lower right')
    fig.tight_layout()
    return fig
