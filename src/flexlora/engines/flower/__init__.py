"""The Flower engine: the same federation as real processes over the network (Flower's Message API).

- :mod:`~flexlora.engines.flower.server_app`: the ``ServerApp`` (``flwr run .`` starts it);
- :mod:`~flexlora.engines.flower.strategy`: :class:`FlexLoRAStrategy`, which learns each node's
  capability, sends each sampled client its own task, and hands the replies to the shared
  :class:`~flexlora.engines.federation.Federation`;
- :mod:`~flexlora.engines.flower.client_app`: the ``ClientApp`` (one per SuperNode), which calls
  the run method's ``client_train``, as the in-process engine does;
- :mod:`~flexlora.engines.flower.wire`: the message format;
- :mod:`~flexlora.engines.flower.inprocess`: a Grid that delivers messages to ClientApps in this
  process (fast parity and failure tests, no daemons);
- :mod:`~flexlora.engines.flower.simulation`: Flower's Ray simulation (``--engine flower-sim``).

Needs the optional extra: ``pip install "flexlora[flower]"``.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Flower engine needs flwr; install it with: pip install \"flexlora[flower]\""
    ) from exc
