"""The checks of the arguments that the three training scripts share (each adds its own)."""

SYNTHER_FLAGS = ("--synther-samples", "--synther-sampler-steps", "--synther-next-states")  # what only --augment synther reads


def settle_augment(args, argv) -> None:
    """Make `--augment` and its alias `--no-dydiff` agree (args.dydiff: DyDiff's rollouts are on), refuse flags of
    another arm, and give `--augment synther` SynthER's own defaults where the command line sets nothing: real ratio 0
    (SynthER's offline runs train on its samples alone) and no filter (`--filter softmax` makes it SynthER-f)."""
    from common.config import given_flags

    given = given_flags(argv)
    if "--augment" in given and "--no-dydiff" in given and args.augment != "none":
        raise SystemExit(f"--no-dydiff is --augment none, and --augment is {args.augment}: drop one of the two")
    if "--augment" in given and "--dydiff" in given and args.augment != "dydiff":
        raise SystemExit(f"--dydiff is --augment dydiff, and --augment is {args.augment}: drop one of the two")
    if not args.dydiff:
        args.augment = "none"
    args.dydiff = args.augment == "dydiff"
    if args.augment != "synther" and (flags := sorted(given & set(SYNTHER_FLAGS))):
        raise SystemExit(
            f"{', '.join(flags)} set SynthER's transitions, and --augment is {args.augment}: add --augment synther"
        )
    if args.augment == "synther":
        if "--real-ratio" not in given:
            args.real_ratio = 0.0
        if "--filter" not in given:
            args.filter = "none"


def shared_arg_problems(args) -> list[str]:
    """One message per invalid run or DyDiff hyper-parameter, each naming the flag and its valid range."""
    problems = non_finite_problems(args)
    if not 0.0 <= args.real_ratio <= 1.0:
        problems.append(f"--real-ratio must be in [0, 1], got {args.real_ratio}")
    if not 0.0 < args.filter_proportion <= 1.0:
        problems.append(f"--filter-proportion must be in (0, 1], got {args.filter_proportion}")
    elif args.augment == "synther":
        if args.filter != "none" and args.filter_proportion * args.synther_samples < 1:
            problems.append(
                f"--filter-proportion {args.filter_proportion} keeps no transition of --synther-samples "
                f"{args.synther_samples}; raise either so that their product is >= 1"
            )
    elif args.filter_proportion * args.rollout_batch_size < 1:
        problems.append(
            f"--filter-proportion {args.filter_proportion} keeps no trajectory of --rollout-batch-size "
            f"{args.rollout_batch_size}; raise either so that their product is >= 1"
        )
    if args.num_iterations is not None and args.num_iterations < 0:
        problems.append(f"--num-iterations must be >= 0, got {args.num_iterations}")
    if args.filter_temperature <= 0:
        problems.append(f"--filter-temperature must be > 0, got {args.filter_temperature}")
    for name in (
        "total_steps",
        "batch_size",
        "eval_freq",
        "eval_episodes",
        "rollout_freq",
        "rollout_batch_size",
        "synthetic_buffer_size",
    ):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_max_steps is not None and args.eval_max_steps < 1:
        problems.append(f"--eval-max-steps must be >= 1, got {args.eval_max_steps}")
    if args.rollout_length < 2:
        problems.append(f"--rollout-length must be >= 2, got {args.rollout_length}")
    if args.sampler_steps < 2:
        problems.append(f"--sampler-steps must be >= 2, got {args.sampler_steps}")
    if args.sampler_churn < 0:
        problems.append(f"--sampler-churn must be >= 0, got {args.sampler_churn}")
    if args.synther_samples < 1:
        problems.append(f"--synther-samples must be >= 1, got {args.synther_samples}")
    if args.synther_sampler_steps < 2:
        problems.append(f"--synther-sampler-steps must be >= 2, got {args.synther_sampler_steps}")
    if args.filter == "none" and args.augment == "dydiff":
        problems.append(
            "--filter none is for --augment synther (SynthER without its filter); DyDiff keeps every trajectory with "
            "--filter-proportion 1"
        )
    problems += ablation_problems(args)
    if args.check_trajectories < 0:
        problems.append(f"--check-trajectories must be >= 0 (0: no check), got {args.check_trajectories}")
    return problems


def ablation_problems(args) -> list[str]:
    """The ablations that swap one of DyDiff's approximations for the real thing, refused where they replace nothing;
    and DyDiff's own rollout flags, refused with SynthER, which makes no rollouts."""
    problems = []
    if args.augment == "synther":
        if args.num_iterations is not None:
            problems.append(
                f"--num-iterations {args.num_iterations} is DyDiff's M, and --augment synther makes no rollouts: drop it"
            )
        for flag, value, default in (
            ("--rollout-states", args.rollout_states, "dm"),
            ("--stored-actions", args.stored_actions, "relabelled"),
            ("--rollout-rewards", args.rollout_rewards, "model"),
            ("--average-with-previous", args.average_with_previous, False),
        ):
            if value != default:
                problems.append(
                    f"{flag} {value} changes DyDiff's rollouts, and --augment synther makes none: drop one of the two"
                )
        return problems
    rounds = args.dydiff and args.num_iterations >= 1 and args.rollout_states != "simulator"
    if not args.dydiff:
        for flag, value, default in (
            ("--rollout-states", args.rollout_states, "dm"),
            ("--stored-actions", args.stored_actions, "relabelled"),
            ("--rollout-rewards", args.rollout_rewards, "model"),
        ):
            if value != default:
                problems.append(f"{flag} {value} changes DyDiff's rollouts, and --no-dydiff makes none: drop one of the two")
        return problems
    if args.rollout_states == "simulator-replay" and args.num_iterations == 0:
        problems.append(
            "--rollout-states simulator-replay replaces the DM's states, and --num-iterations 0 samples none: use "
            "--num-iterations >= 1 (or --rollout-states simulator for rollouts in the simulator itself)"
        )
    if args.average_with_previous and (args.rollout_states != "dm" or args.stored_actions != "relabelled"):
        problems.append(
            "--average-with-previous mixes each round's states with the previous ones, so the states are no longer the "
            "simulator's or the stored transitions the dynamics' own: drop it, or the ablation flag"
        )
    if args.stored_actions == "conditioning" and not rounds:
        why = "--rollout-states simulator has no DM rounds" if args.rollout_states == "simulator" else "--num-iterations 0"
        problems.append(
            f"--stored-actions conditioning keeps the actions the last DM round was given, and {why}: its actions are "
            f"already those its states came from (drop the flag)"
        )
    return problems


def non_finite_problems(args, prefix: str = "--") -> list[str]:
    """One message per float hyper-parameter that is NaN or infinite (nested configs too: --pretrain.dm-lr)."""
    import dataclasses
    import math

    problems = []
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        flag = prefix + f.name.replace("_", "-")
        if dataclasses.is_dataclass(value):
            problems += non_finite_problems(value, flag + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{flag} must be a finite number, got {value}")
    return problems
