"""The runtime: what ships to inference machines (needs only torch, timm, numpy, pyyaml, pillow).

Layers, each importing only those before it: :mod:`~rapid_search.runtime.ops` (pure token
operations) and :mod:`~rapid_search.runtime.schedule` (the schedule file), then
:mod:`~rapid_search.runtime.engine` (the shared reducing forward, adapted from timm 1.0.31),
:mod:`~rapid_search.runtime.families` (one adapter per supported timm model family, and
``check_model``), :mod:`~rapid_search.runtime.flops` (the cost model),
:mod:`~rapid_search.runtime.presets` (hand-set RAPID and ToMe schedules) and
:mod:`~rapid_search.runtime.patch` (``apply`` / ``remove``). The public names are re-exported by
:mod:`rapid_search`.
"""
