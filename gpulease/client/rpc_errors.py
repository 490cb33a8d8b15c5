"""How the client reads a failed gRPC call, public: for code that talks to a coordinator over its
own channel and wants the client's answers.

``to_error`` rebuilds the typed ``gpulease.errors`` error a coordinator raised (the one rule of
``gpulease.rpc_status``, with the client's own deadline). ``should_retry`` and ``never_sent`` are
the client's decision whether an UNAVAILABLE call may be sent again. The code lives in the
client's private ``_errors`` module.
"""

from gpulease.client._errors import never_sent, should_retry, to_error

__all__ = ["never_sent", "should_retry", "to_error"]
