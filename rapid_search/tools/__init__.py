"""Tools above the runtime: image folders (:mod:`~rapid_search.tools.data`), weights
(:mod:`~rapid_search.tools.loading`), timing (:mod:`~rapid_search.tools.measure`), scoring
(:mod:`~rapid_search.tools.evaluate`), paired statistics (:mod:`~rapid_search.tools.stats`),
versions (:mod:`~rapid_search.tools.provenance`), and the ``bench`` and ``visualize`` commands.
The search (:mod:`rapid_search.search`) and the command line build on them; nothing in the
runtime imports them.
"""
