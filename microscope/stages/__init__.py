"""One function per stage: load inputs, call the mathematics, write artifacts, return a StageRecord.

What every stage does around its computation (content key, lock, cache check, checksums, manifest
last) lives once, in `microscope.stages.runner`.
"""
