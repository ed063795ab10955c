"""CCNet, the model (Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation",
ICCV 2019): dilated backbone, RCCA head, auxiliary head, losses, inference and metrics.
A plain PyTorch library on top of ``ops``."""
