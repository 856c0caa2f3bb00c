"""Branch workflows beyond switching one address: protected branches (``protect``), extra
ports pinned to fixed branches (``pinned``), and a branch as it was at a past moment
(``moments``). README, "Team workflows"."""
