"""cocord_fast: contrastive knowledge distillation (CoCoRD, CRD, KD) at ImageNet scale."""
__version__ = "0.1.0"
