from callbacks.nan_policy import *  # noqa: F401,F403 -- moved to callbacks/nan_policy.py (issue #11); re-export for framework.trainer until integration
