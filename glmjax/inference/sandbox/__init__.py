"""The sandbox behind the Python tool (:mod:`glmjax.inference.python_tool`).

Host side: :mod:`.host` (start, supervise, judge), :mod:`.limits` (limits and results),
:mod:`.cleanup` (removal of hostile directory trees).  Child side, run by path in the child
interpreter and importing only the standard library and ``pyseccomp``: :mod:`.child`
(process roles and the runner), :mod:`.kernel` (namespaces, root file system,
capabilities), :mod:`.seccomp_filter` and :mod:`.guard` (the audit hook).
"""
