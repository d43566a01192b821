"""The attribution graph, in one place: the in-memory graph (:mod:`.model`), its stored form
(:mod:`.artifact`, format described in ``docs/graph-format.md``) and the signed multi-hop
influence maths both the writer and the reader use (:mod:`.influence`).

Written by the attribution service, read by the analysis service; it imports neither.
"""
