"""How a model family is cut: channel groups of any CNN traced from its graph (:mod:`.channels`),
heads and FFN neurons of a BERT encoder (:mod:`.bert`). Pruning slices the existing modules in
place and runs the pruned model once before returning it."""
