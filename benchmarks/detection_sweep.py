"""Run layer detection over every model timm can create, on the meta device.

    python benchmarks/detection_sweep.py timm            # all timm architectures
    python benchmarks/detection_sweep.py timm --filter 'vit_*'

Prints one line per model (detector, eligible tensors, share of parameters masked)
and a summary; lines starting with ``!`` are models worth a look (fallback rule,
error, or a share outside 30-99%).
"""
