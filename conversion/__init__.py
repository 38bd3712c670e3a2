"""Conversion of reference checkpoints (GitHub microsoft/implicit_languagemodels) into Hub repos that load with
`trust_remote_code=True`, and publishing them. Builds on `modeling_implicit` only through its public classes."""
