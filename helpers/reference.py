"""Published numbers the book compares against (literature values, each with its source).

These are not results of this project; they are printed beside ours, labelled as published.
"""
from __future__ import annotations

import pandas as pd

MEDMNIST_V2_SOURCE = ("Yang et al., MedMNIST v2, Scientific Data 10, 41 (2023), Table 3 "
                      "(test split; medmnist.com)")

# (method, flag) -> (AUC, ACC), test split, from MedMNIST v2.
MEDMNIST_V2 = {
    "ResNet-18 (28)": {"organamnist": (.997, .935), "pneumoniamnist": (.944, .854), "breastmnist": (.901, .863),
                       "bloodmnist": (.998, .958), "dermamnist": (.917, .735)},
    "ResNet-18 (224)": {"organamnist": (.998, .951), "pneumoniamnist": (.956, .864), "breastmnist": (.891, .833),
                        "bloodmnist": (.998, .963), "dermamnist": (.920, .754)},
    "ResNet-50 (28)": {"organamnist": (.997, .935), "pneumoniamnist": (.948, .854), "breastmnist": (.857, .812),
                       "bloodmnist": (.997, .956), "dermamnist": (.913, .735)},
    "ResNet-50 (224)": {"organamnist": (.998, .947), "pneumoniamnist": (.962, .884), "breastmnist": (.866, .842),
                        "bloodmnist": (.997, .950), "dermamnist": (.912, .731)},
    "auto-sklearn": {"organamnist": (.963, .762), "pneumoniamnist": (.942, .855), "breastmnist": (.836, .803),
                     "bloodmnist": (.984, .878), "dermamnist": (.902, .719)},
    "AutoKeras": {"organamnist": (.994, .905), "pneumoniamnist": (.947, .878), "breastmnist": (.871, .831),
                  "bloodmnist": (.998, .961), "dermamnist": (.915, .749)},
    "Google AutoML Vision": {"organamnist": (.990, .886), "pneumoniamnist": (.991, .946),
                             "breastmnist": (.919, .861), "bloodmnist": (.998, .966), "dermamnist": (.914, .768)},
}


def medmnist_v2_table(flags: list[str] | None = None) -> pd.DataFrame:
    """Long table (method, flag, auc, acc, source) of MedMNIST v2's published test numbers."""
    rows = [{"method": m, "flag": f, "auc": auc, "acc": acc, "source": "MedMNIST v2 (published)"}
            for m, per in MEDMNIST_V2.items() for f, (auc, acc) in per.items()
            if flags is None or f in flags]
    return pd.DataFrame(rows)


RLMEDNAS_SOURCE = ("Ashwashhere/RLMedNAS README (one run, no seeds; rows are means over the 100 episodes of "
                   "each phase: reward = accuracy - 1e-6 * params exactly)")

# phase -> (mean reward, mean params, mean val accuracy), OrganAMNIST val split, 5-epoch children;
# all three phases used the reference's controller (constant input, no baseline).
RLMEDNAS = {"random": (0.8215, 132_503, 0.9540), "rl": (0.8571, 98_987, 0.9561),
            "rl_masked": (0.9084, 46_557, 0.9549)}


# Val images the reference scored: its val loader used drop_last with batches of 128, so 6,400 of
# OrganAMNIST's 6,491 (we score all of them).
RLMEDNAS_VAL_SCORED = 6400


def rlmednas_table() -> pd.DataFrame:
    """The published RLMedNAS phase table (means over each phase's episodes)."""
    return pd.DataFrame([{"strategy": k, "reward": r, "params": p, "val_acc": a, "source": "RLMedNAS (published)"}
                         for k, (r, p, a) in RLMEDNAS.items()])
