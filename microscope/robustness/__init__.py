"""Adversarial robustness: attack surfaces per model family, our PGD/FGSM/noise sweeps, and the reference
AutoAttack (pyautoattack) run on the same samples for every variant."""
