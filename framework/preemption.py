from callbacks.preemption import *  # noqa: F401,F403 -- moved to callbacks/preemption.py (issue #11); re-export for framework.trainer until integration
