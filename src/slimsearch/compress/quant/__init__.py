"""Weight and activation quantization, simulated in float and trained through (QAT):
grids (:mod:`.grid`), sparsity masks (:mod:`.sparsity`) and the quantized layers (:mod:`.layers`)."""
