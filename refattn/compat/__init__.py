"""Drop-in front-ends that keep another library's exact signature and conventions.

Each is a thin translation into :func:`refattn.attention`; no semantics live here.
"""
