"""create_app builds an app and starts nothing: outbox delivery starts where the app is
served (each gunicorn worker, serving.py) or when a caller asks."""

from __future__ import annotations

import threading

from proxy import config, create_app


def test_building_an_app_starts_no_thread_and_no_delivery(sandboxes, tmp_path):
    before = set(threading.enumerate())
    settings = config.load(overrides={**sandboxes.proxy_settings(),
                                      "outbox_path": str(tmp_path / "outbox.sqlite3")}, environ={})
    app = create_app(settings)
    services = app.extensions["ccproxy"]
    try:
        assert services.deliverer is None
        assert set(threading.enumerate()) - before == set()
        services.start_delivery()  # what serving.py's post_worker_init does in each worker
        assert services.deliverer is not None
    finally:
        services.close()
    assert services.deliverer is None


def test_the_fixture_can_leave_delivery_off(make_app):
    assert make_app(start_delivery=False).extensions["ccproxy"].deliverer is None
    assert make_app().extensions["ccproxy"].deliverer is not None
