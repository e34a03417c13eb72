"""``fleet dashboard``: a workflow page and a JSON API over the run logs (DESIGN §5b).

:mod:`fleet.dashboard.views` folds one run log (:mod:`fleet.runlog`) into a workflow's
view; :mod:`fleet.dashboard.data` finds the logs and keeps the views current;
:mod:`fleet.dashboard.app` serves them (HTML, ``/api/``, server-sent events) behind basic
auth (:mod:`fleet.dashboard.auth`) and cancels a workflow through :mod:`fleet.cancel`;
:mod:`fleet.dashboard.metrics` renders Prometheus metrics.
"""
