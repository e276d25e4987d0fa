"""LiteVAR edge compiler: load VAR checkpoints, compress them, and lower them with TVM."""
from device.cores import claim_cores

claim_cores()   # tuning measurements and compiled kernels run here use every core (see device/cores.py)
