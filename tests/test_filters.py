"""The routers' filters run on the event loop.

aiogram runs a filter that is a plain function (a magic filter such as F.photo included) in a
worker thread, each time it checks a message: a thread hop per filter per message, and memory
in every worker thread's allocator. Every message passes the filters of each router before the
one that takes it, so they must all be coroutines.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiogram import Router

from handlers.app import root_router


def all_routers(router: Router) -> Iterator[Router]:
    yield router
    for sub in router.sub_routers:
        yield from all_routers(sub)


def test_every_filter_of_every_router_is_a_coroutine() -> None:
    in_threads = []
    checked = 0
    for router in all_routers(root_router()):
        for event, observer in router.observers.items():
            # observer._handler holds the router-wide filters (router.message.filter(...))
            for handler in (observer._handler, *observer.handlers):
                for filter_ in handler.filters or ():
                    checked += 1
                    if not filter_.awaitable:
                        in_threads.append(f"{router.name} {event}: {filter_.callback!r}")
    assert checked > 20  # the walk reached the routers' filters
    assert in_threads == []
