"""Intake: from a forge delivery to a decision, without touching the network.

    signature.py  is this delivery really from our forge?      verify_signature
    event.py      is it a new comment on an open PR?           parse_event -> CommentEvent | Ignored
    grammar.py    what does the comment ask for?               parse_comment -> Ignore | Reply | Command
    policy.py     may its author ask that?                     authorize -> Decision

Each step is a pure function (the policy's one forge call comes in as a callback), so the
webhook view composes them in order and the tests drive them table by table.
"""
