"""Adversarial Policy Gradient Augmentation (APGA; Cheng, Iriondo et al., MICCAI 2019) and its baselines.

* :mod:`.masks`: erasing and inverse masking of normalised images, mask overlap.
* :mod:`.agent`: the agent's Bernoulli policy per pixel or per cell of pixels (sampled, or the
  reference's greedy threshold) and its REINFORCE loss with the reference's area penalties.
* :mod:`.hooks`: the per-batch procedures as :class:`helpers.train.Hook` s for the shared ``fit``:
  APGA, and the equal-budget controls (a second clean step, cutout, Grad-CAM masks of a frozen
  baseline, end-to-end soft masks).
* :mod:`.gradcam`: Grad-CAM maps with captum's ``LayerGradCam``.
* :mod:`.batchnorm`: BatchNorm statistics re-estimated on the clean training images before each
  evaluation ("precise BN"), for every method alike.
* :mod:`.protocol`: k-shot training subsets, the fair protocol (one schedule, the same validation
  looks and selection rule for every method, test once) and the result tables.
"""
from .agent import agent_loss, cell_logits, sample_mask, to_pixels
from .batchnorm import PreciseBNScorer, recompute_bn_stats
from .gradcam import gradcam_maps, last_conv_layer
from .hooks import APGAHook, CutoutHook, EndToEndHook, GradCAMHook, RepeatHook
from .masks import erase, fill_value, keep_only, overlap
from .protocol import METHODS, check_equal_looks, kshot, run_protocol

__all__ = ["agent_loss", "cell_logits", "sample_mask", "to_pixels", "PreciseBNScorer", "recompute_bn_stats",
           "gradcam_maps", "last_conv_layer", "APGAHook", "CutoutHook", "EndToEndHook", "GradCAMHook", "RepeatHook",
           "erase", "fill_value", "keep_only", "overlap", "METHODS", "check_equal_looks", "kshot", "run_protocol"]
