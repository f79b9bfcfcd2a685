"""Policy Gradient-Driven Noise Mask (Yavuz & Yang 2024): a Beta-noise policy "heats" a classifier.

Pieces: :mod:`.mask` (upsample, blur, multiply), :mod:`.policy` (the conditional Beta policy and the
random control), :mod:`.hooks` (the policy inside ``fit``: REINFORCE or the reference's coupled
loss; linear warm-up; checkpoint weight averaging), :mod:`.mix` (the multi-modality mix with a joint label space),
:mod:`.protocol` (phase 1, phase 2, controls and transfer as stored units), :mod:`.figures`.
"""
from .hooks import MODES, FaithfulCriterion, LinearWarmup, NoiseMaskHook, PolicyConfig, WeightAveraging
from .mask import MaskConfig, apply_mask, blur, gaussian_kernel1d, make_mask, upsample
from .mix import JointLabels, MixDataset, build_mix, kshot, leave_one_out, per_dataset_metrics, present_flags, to_channels
from .policy import NoisePolicy, RandomBetaMasks, beta_for_mean

__all__ = ["MODES", "FaithfulCriterion", "LinearWarmup", "NoiseMaskHook", "PolicyConfig", "WeightAveraging", "MaskConfig",
           "apply_mask", "blur", "gaussian_kernel1d", "make_mask", "upsample", "JointLabels", "MixDataset",
           "build_mix", "kshot", "leave_one_out", "per_dataset_metrics", "present_flags", "to_channels",
           "NoisePolicy", "RandomBetaMasks", "beta_for_mean"]
