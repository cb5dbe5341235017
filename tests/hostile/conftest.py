"""The hostile suite: the e2e fixtures (real sshd, the gateway in-process on uvloop) reused as they are."""

from tests.e2e.conftest import (  # noqa: F401 - fixtures are found by name
    echo,
    gw,
    keys,
    make_gateway,
    pytest_asyncio_loop_factories,
    vm,
    watcher,
)
