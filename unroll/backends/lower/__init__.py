"""The lowering shared by the compiled targets: scalar expressions, index maps, decompositions."""
