"""``fleet dashboard``: a workflow page and a JSON API over the run logs (DESIGN §5b).

:mod:`fleet.dashboard.data` folds the run logs of :mod:`fleet.runlog` into one view per
workflow; :mod:`fleet.dashboard.app` serves them (HTML, ``/api/``, server-sent events)
behind basic auth, and cancels a workflow through :mod:`fleet.cancel`.
"""
