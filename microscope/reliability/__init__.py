"""Reliability under shift: calibration, out-of-distribution detection, common corruptions."""
