"""A CPU preset of nnU-Net's planner, for tests and the demo on a laptop-class CPU.

Same planning logic as nnU-Net's ``ExperimentPlanner`` (target spacing, topology, normalisation,
batch-size cap), only scaled down: U-Net features start at 8 (cap 64 in 3D, 128 in 2D) and the memory
references are chosen so that, at the default 8 GB, 3d_fullres patches stay near 32^3 with batch size 2
and 2d patches below ~128^2. A 3d_fullres training step then takes a fraction of a second on 2 CPU cores.
Results are not meant to compete with nnU-Net's default plans.
"""
from typing import List, Optional, Tuple, Union

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner


class nnUNetPlannerCPU(ExperimentPlanner):
    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: str = 'nnUNetCPUPlans',
                 overwrite_target_spacing: Optional[Union[List[float], Tuple[float, ...]]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_base_num_features = 8
        self.UNet_max_features_3d = 64
        self.UNet_max_features_2d = 128
        # nnU-Net's estimate (compute_conv_feature_map_size) for features 8..64: 32^3 -> 1.83e6, 64^2 -> 3.2e5
        self.UNet_reference_val_3d = 2_000_000
        self.UNet_reference_val_2d = 150_000
