"""The Callback base lives in the core (``framework.hooks``); this path keeps older imports working."""

from framework.hooks import Callback, CallbackList

__all__ = ["Callback", "CallbackList"]
