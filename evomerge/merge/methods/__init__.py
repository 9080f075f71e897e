"""Merge methods as data: what each accepts and needs (:mod:`.spec`), the entries (:mod:`.builtin` and one module
per data-aware method), the registry (:mod:`.registry`), and recipe -> kernel-argument resolution (:mod:`.resolve`)."""
