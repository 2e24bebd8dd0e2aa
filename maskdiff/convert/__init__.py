"""Importers for official checkpoints into maskdiff backbones."""

from maskdiff.convert.dit import convert_dit_state_dict, infer_dit_config, load_official_dit, unwrap_state_dict
from maskdiff.convert.mae import convert_mae_state_dict, fold_pixel_normalization, infer_mae_config, load_official_mae, mae_from_official
from maskdiff.convert.umd import convert_umd_params, infer_umd_config, load_big_vision_params, load_official_umd

__all__ = [
    "convert_dit_state_dict", "convert_mae_state_dict", "fold_pixel_normalization", "infer_dit_config", "infer_mae_config",
    "load_official_dit", "load_official_mae", "mae_from_official", "unwrap_state_dict",
    "convert_umd_params", "infer_umd_config", "load_big_vision_params", "load_official_umd",
]
