"""The logit check's numbers by name, in the order they are shown: one list that the check's
result, the report's columns, its figures and tables, and the CLI all take (no torch here, so the
report and the plan can import it)."""

# What logit_check measures (check.py's result carries each of these keys).
LOGIT_METRICS = ("max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement", "kl", "loss_ref", "loss_converted")

# Every field of a check record that the report carries: the numbers, the verdict and how it ran.
CHECK_FIELDS = (*LOGIT_METRICS, "check_passed", "tolerance", "check_device", "check_dtype",
                "check_separators", "check_documents", "check_real_tokens")

# A small (converted) or medium file's validation loss on the lab's held-out tokens, and over how
# many predictions (empty when validation is off or its language pair has no shard).
VALIDATION_FIELDS = ("val_loss", "val_tokens")
