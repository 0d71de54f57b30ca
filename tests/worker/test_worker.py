"""The worker's duties, one by one, in-process: admission, cancels, endings, starting, recovery."""

from __future__ import annotations

import json

from ccci.errors import ConfigError, TransientInfraError
from ccci.intake.delivery import handle_delivery
from ccci.worker import Worker
from tests.fakes import sign
from tests.worker.conftest import OWNER, REPO, SECRET


def final_comment(world, number: int):
    [comment] = world.bot_comments(number)
    return comment


# -- the whole way --------------------------------------------------------------------------------


def test_a_testme_is_admitted_started_held_and_reported_exactly_once(world):
    sha = world.open_pr(1)
    answer = world.testme(1)
    assert answer["status"] == 202 and answer["result"] == "queued"
    world.settle()
    run_id = answer["run"]
    assert run_id in world.dispatcher.held and world.dispatcher.refs[run_id] == world.run(run_id).dispatch_ref
    assert world.states(sha) == ["pending", "pending"] and "running" in final_comment(world, 1).body
    assert ("ccci", "eyes") in world.gitea.reactions[answer["comment_id"]]

    world.dispatcher.release(run_id, "passed")
    world.settle()
    comment = final_comment(world, 1)
    assert "passed" in comment.body.split("\n")[1] and world.run(run_id).state == "passed"
    assert world.states(sha) == ["pending", "pending", "success"]
    world.settle()  # nothing more happens: one final report
    assert len(world.bot_comments(1)) == 1 and world.states(sha)[-1] == "success" and len(world.states(sha)) == 3


def test_max_runs_holds_the_queue_and_the_next_starts_when_one_ends(make_world):
    world = make_world(MAX_RUNS=1)
    world.open_pr(1)
    world.open_pr(2)
    first, second = world.testme(1)["run"], world.testme(2)["run"]
    world.settle()
    assert set(world.dispatcher.held) == {first} and world.run(second).state == "queued"
    assert "position 1 in the queue" in final_comment(world, 2).body
    world.dispatcher.release(first)
    world.settle()
    assert set(world.dispatcher.held) == {second}


# -- admission ------------------------------------------------------------------------------------


def test_an_organisation_member_is_admitted_and_a_stranger_refused_once(make_world):
    world = make_world(ALLOWED_USERS=(), ALLOWED_ORGS=(OWNER,))
    world.gitea.add_member(OWNER, "bob")
    world.open_pr(1)
    member = world.testme(1, user="bob")["run"]
    stranger = [world.testme(1, user="mallory")["run"] for _ in range(3)]
    world.settle()
    assert member in world.dispatcher.held
    assert all(world.run(r).state == "refused" for r in stranger)
    refusals = [c for c in world.bot_comments(1) if "@mallory" in c.body]
    assert len(refusals) == 1  # three tries, one explanation


def test_a_membership_check_the_forge_cannot_answer_is_asked_again_not_refused(make_world):
    world = make_world(ALLOWED_USERS=(), ALLOWED_ORGS=(OWNER,))
    world.gitea.add_member(OWNER, "bob")
    world.open_pr(1)
    world.gitea.set_down(True)
    run_id = world.testme(1, user="bob")["run"]
    world.worker.run_pass()
    assert world.run(run_id).state == "queued"  # not refused: the forge was down
    world.gitea.set_down(False)
    world.worker.admission.backoff.clear(run_id)  # the pause is over
    world.settle()
    assert run_id in world.dispatcher.held


def test_a_pull_request_closed_before_the_run_starts_ends_canceled(world):
    world.open_pr(1)
    run_id = world.testme(1)["run"]
    world.gitea.close_pr(OWNER, REPO, 1)
    world.settle()
    assert world.run(run_id).state == "canceled" and "closed before the run started" in world.run(run_id).note
    assert not world.dispatcher.held


def test_a_pull_request_the_forge_does_not_know_ends_in_error_without_a_word_to_it(world):
    world.open_pr(1)
    run_id = world.testme(1)["run"]
    del world.gitea.pulls[(OWNER, REPO, 1)]
    world.settle()
    assert world.run(run_id).state == "error" and "not found" in world.run(run_id).note
    assert world.store.outbox_backlog() == 0


def test_a_head_that_is_not_a_commit_id_ends_in_error(world):
    world.open_pr(1)
    world.gitea.pulls[(OWNER, REPO, 1)].head_sha = "main"
    run_id = world.testme(1)["run"]
    world.settle()
    assert world.run(run_id).state == "error" and "is not a sha" in world.run(run_id).note
    assert "is not a sha" in final_comment(world, 1).body


def test_a_newer_testme_supersedes_the_running_one(world):
    world.open_pr(1)
    older = world.testme(1)["run"]
    world.settle()
    newer = world.testme(1)["run"]
    world.settle()
    assert world.dispatcher.canceled == [older]  # signaled once; the newer waits for it to end
    assert world.run(newer).state == "queued" and newer not in world.dispatcher.held
    world.dispatcher.release(older, "canceled")
    world.settle()
    assert newer in world.dispatcher.held
    collapsed = next(c for c in world.bot_comments(1) if f"ccci:run={older}" in c.body)
    assert f"superseded by run #{newer}" in collapsed.body


# -- cancels --------------------------------------------------------------------------------------


def test_the_requester_cancels_by_comment_and_a_stranger_is_refused(world):
    world.open_pr(1)
    run_id = world.testme(1)["run"]
    world.settle()
    world.testme(1, "!testme cancel", user="mallory")
    world.settle()
    assert world.dispatcher.canceled == [] and any("@mallory" in c.body for c in world.bot_comments(1))
    world.testme(1, "!testme cancel", user="alice")
    world.settle()
    assert world.dispatcher.canceled == [run_id]
    world.dispatcher.release(run_id, "canceled")
    world.settle()
    assert "canceled by @alice" in next(c for c in world.bot_comments(1) if f"ccci:run={run_id}" in c.body).body


def test_canceling_a_queued_run_dequeues_it_and_every_source_goes_through_one_call(make_world):
    world = make_world(MAX_RUNS=1)
    world.open_pr(1)
    world.open_pr(2)
    world.testme(1)
    queued = world.testme(2)["run"]
    world.settle()
    assert world.store.request_cancel(queued, "an operator")  # what the admin API and the CLI call
    world.settle()
    assert world.run(queued).state == "canceled" and queued not in world.dispatcher.held
    assert not world.store.request_cancel(queued, "again")  # finished: nothing to cancel


def test_a_strangers_malformed_commands_get_no_answer_and_a_members_one(make_world):
    world = make_world(ALLOWED_USERS=(), ALLOWED_ORGS=(OWNER,))
    world.gitea.add_member(OWNER, "bob")
    world.open_pr(1)
    for i in range(5):
        world.testme(1, f"!testme please {i}", user="mallory")
    world.testme(1, "!testme plz", user="bob")
    world.testme(1, "!testme plz again", user="bob")
    world.settle()
    bodies = [c.body for c in world.bot_comments(1)]
    assert len(bodies) == 1 and "did not understand" in bodies[0]
    mallory = [c.id for c in world.gitea.comments_on(OWNER, REPO, 1) if c.user == "mallory"]
    assert not any(world.gitea.reactions.get(cid) for cid in mallory)


# -- endings and starting ---------------------------------------------------------------------------


def test_a_harness_gone_without_a_report_ends_interrupted_and_says_what_was_cleaned(world):
    world.open_pr(1)
    run_id = world.testme(1)["run"]
    world.settle()
    world.dispatcher.lose(run_id, cleanup="its app, lock and ABRA_DIR were cleaned up")
    world.settle()
    body = final_comment(world, 1).body
    assert world.run(run_id).state == "error" and "interrupted" in body and "cleaned up" in body and "!testme" in body


def test_a_harness_that_never_began_is_simply_started_again(world):
    world.open_pr(1)
    run_id = world.testme(1)["run"]
    world.settle()
    world.dispatcher.lose(run_id, "its harness exited with status 75", requeue=True)
    world.settle()
    assert run_id in world.dispatcher.held and world.run(run_id).state == "running"  # started once more
    world.dispatcher.release(run_id)
    world.settle()
    assert world.run(run_id).state == "passed" and len(world.bot_comments(1)) == 1


def test_a_harness_killed_past_its_deadline_ends_timed_out(world):
    world.open_pr(1)
    run_id = world.testme(1)["run"]
    world.settle()
    world.dispatcher.lose(run_id, "its harness outlived the run's deadline and was killed", timed_out=True)
    world.settle()
    assert world.run(run_id).state == "timed_out" and "outlived" in final_comment(world, 1).body


def test_a_report_saying_canceled_that_nobody_asked_for_is_an_interruption(world):
    world.open_pr(1)
    run_id = world.testme(1)["run"]
    world.settle()
    world.dispatcher.release(run_id, "canceled")  # stopped by its worker's death, as after a restart
    world.settle()
    assert "interrupted" in final_comment(world, 1).body and "its own teardown ran" in final_comment(world, 1).body


def test_the_report_says_when_the_pull_request_head_moved(world):
    sha = world.open_pr(1)
    run_id = world.testme(1)["run"]
    world.settle()
    world.gitea.move_head(OWNER, REPO, 1, "b" * 40)
    world.dispatcher.release(run_id)
    world.settle()
    body = final_comment(world, 1).body
    assert "Stale" in body and "bbbbbbbbbb" in body and sha[:10] in body


def test_a_dispatcher_that_is_down_leaves_the_run_queued_and_one_that_refuses_ends_it(world):
    world.open_pr(1)
    world.dispatcher.fail_next_start = TransientInfraError("Drone is down")
    run_id = world.testme(1)["run"]
    world.worker.run_pass()
    assert world.run(run_id).state == "queued" and not world.dispatcher.held
    world.settle()
    assert run_id in world.dispatcher.held  # tried again on a later pass
    world.open_pr(2)
    world.dispatcher.fail_next_start = ConfigError("DRONE_REPO", "Drone matched no pipeline")
    refused = world.testme(2)["run"]
    world.settle()
    assert world.run(refused).state == "error" and "could not start" in final_comment(world, 2).body


# -- recovery ---------------------------------------------------------------------------------------


def test_a_restarted_worker_adopts_running_runs_and_requeues_one_that_never_got_a_harness(world):
    world.open_pr(1)
    world.open_pr(2)
    adopted = world.testme(1)["run"]
    world.settle()
    never = world.testme(2)["run"]
    world.settle()
    world.store.update_run(never, dispatch_ref=None)  # the old worker died between marking and recording
    fresh = Worker(world.settings, world.forge, store=world.store, dispatcher=world.dispatcher)
    world.dispatcher.held.clear()
    fresh.recover()
    assert world.dispatcher.adopted == [adopted] and world.run(never).state == "queued"
    world.worker = fresh
    world.settle()
    assert set(world.dispatcher.held) == {adopted, never}


def test_a_repository_whose_name_is_no_recipe_name_gets_a_clear_answer_at_once(make_world):
    world = make_world()
    world.gitea.open_pr(OWNER, "Custom-HTML", 1, "c" * 40)
    comment = world.gitea.post_comment(OWNER, "Custom-HTML", 1, "!testme", user="alice")
    raw = json.dumps(world.gitea.comment_payload(comment.id)).encode()
    answer = handle_delivery(world.settings, world.store, world.worker.reporter, sign(raw, SECRET), raw)
    assert answer.status == 200 and answer.body["result"] == "replied"
    world.settle()
    assert world.store.list_runs() == []  # nothing queued that could never start
    [reply] = [c for c in world.gitea.comments_on(OWNER, "Custom-HTML", 1) if c.user == world.gitea.bot_login]
    assert "`Custom-HTML`" in reply.body and "cannot be a Co-op Cloud recipe name" in reply.body
