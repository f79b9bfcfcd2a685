"""The RL-weighted deep ensemble chapter (after MURA-RL-DeepEnsembleV3): cross-fitted SE-ResNet
members, combiners learnt from their stored out-of-fold scores (averaging, a stacker, a weighting
network trained with the reference's loss, with cross-entropy, or with REINFORCE), an oversampled
expert with a gate, the reference's augmentation in two implementations, and a MURA loader."""
