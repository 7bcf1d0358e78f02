"""Dispatch: try a plan's candidate routes until one serves the request (see dispatcher.py).

    context.py       RequestContext, OpenedStream, ServedResponse: what the parts share
    retry.py         RetryPolicy: retry the same route or fall back, and the backoff
    dispatcher.py    Dispatcher: the candidate loop and one attempt
    stream_guard.py  StreamGuard: a stream after its first output; never fakes success

Imports go dispatcher -> stream_guard -> context, and dispatcher -> retry -> context.
"""

from gateway.dispatch.context import OpenedStream, RequestContext, ServedResponse
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.stream_guard import StreamGuard

__all__ = ["Dispatcher", "OpenedStream", "RequestContext", "ServedResponse", "StreamGuard"]
