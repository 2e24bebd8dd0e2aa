"""Importers for official checkpoints into maskdiff backbones."""

from maskdiff.convert.dit import convert_dit_state_dict, infer_dit_config, load_official_dit, unwrap_state_dict

__all__ = ["convert_dit_state_dict", "infer_dit_config", "load_official_dit", "unwrap_state_dict"]
