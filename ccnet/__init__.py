"""CCNet, the model (Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation",
ICCV 2019): dilated backbone, RCCA head, auxiliary head, losses, inference and metrics.
A plain PyTorch library on top of ``ops``.

    from ccnet import build_ccnet, CCNetLoss, predict, InferenceConfig, ConfusionMatrix
    model = build_ccnet(19, backbone="resnet101", recurrence=2)
"""

from .attention import CrissCrossAttention, attention_maps, pixel_attention
from .backbone import BACKBONES, build_backbone
from .heads import FCNHead, RCCAHead
from .inference import InferenceConfig, predict, sliding_window, whole
from .losses import IGNORE_INDEX, CCNetLoss, ohem_mask, segmentation_loss
from .metrics import ConfusionMatrix
from .model import CCNet, build_ccnet, convert_sync_batchnorm
from .non_local import NonLocal2d

__all__ = [
    "BACKBONES", "CCNet", "CCNetLoss", "ConfusionMatrix", "CrissCrossAttention", "FCNHead",
    "IGNORE_INDEX", "InferenceConfig", "NonLocal2d", "RCCAHead", "attention_maps", "build_backbone", "build_ccnet",
    "convert_sync_batchnorm", "ohem_mask", "pixel_attention", "predict", "segmentation_loss", "sliding_window",
    "whole",
]
