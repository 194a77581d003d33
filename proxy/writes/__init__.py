"""The mediarithmics write side, one module per job:

- `submit`: a write into the durable outbox, its 202 answer, and its status route;
- `activities`: user activities (validation and the POST route);
- `pixel`: the email-open pixel and its links;
- `choices`: profile and user choice updates;
- `consent`: one-click consent links and the pages a recipient sees;
- `link_urls`: where a link points (the public base URL) and until when.

Every write goes through the durable outbox and is answered 202 with an id; none is cached.
"""

from __future__ import annotations

from flask import Blueprint


def blueprints() -> list[Blueprint]:
    """The write side's Flask blueprints, for the app to register."""
    from . import activities, choices, consent, pixel, submit

    return [submit.bp, activities.bp, pixel.bp, choices.bp, consent.bp]
