"""Board-side runtime: offline image generation with the TVM runtime, numpy and Pillow only."""
from device.cores import claim_cores

claim_cores()   # before TVM's thread pool exists: it would take half the cores of an x86 without SMT
