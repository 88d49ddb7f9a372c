"""bench/cost.py's reading of callgrind_annotate's output (`--top`): no valgrind needed."""

from __future__ import annotations

from bench.cost import _top_functions

ANNOTATED = """\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
1,000,000 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                   file:function
--------------------------------------------------------------------------------
1,000,000 (100.0%)  ./csu/../csu/libc-start.c:__libc_start_main [/usr/lib/libc.so.6]
  990,000 (99.00%)  /python/ceval.c:_PyEval_EvalFrameDefault [/lib/libpython3.11.so]
  800,000 (80.00%)  ???:CPyDef_caching___CachingRelay___on_client_data [/cacheproxy/_hot__mypyc.so]
  800,000 (80.00%)  ???:CPyPy_caching___CachingRelay___on_client_data [/cacheproxy/_hot__mypyc.so]
  300,000 (30.00%)  ???:0x0000000006336920 [???]
  250,000 (25.00%)  /python/dictobject.c:_Py_dict_lookup [/lib/libpython3.11.so]
  200,000 (20.00%)  ???:CPyDef_cache___engine___CacheEngine___get [/cacheproxy/_hot__mypyc.so]
  100,000 (10.00%)  /python/ceval.c:_PyEval_EvalFrameDefault'2 [/lib/libpython3.11.so]
"""


def test_top_functions_are_named_ranked_and_exclude_the_frames_around_everything() -> None:
    assert _top_functions(ANNOTATED, 10) == [
        (800_000, "caching.CachingRelay.on_client_data"),
        (250_000, "_Py_dict_lookup (CPython)"),
        (200_000, "cache.engine.CacheEngine.get"),
    ]  # (a recursive frame's later lines ('2) are the same function: its first, outermost, line stands for it)
    assert len(_top_functions(ANNOTATED, 2)) == 2
