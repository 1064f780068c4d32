# pushload flags per scenario and workers per size, shared by perf/run.sh and
# perf/compare.sh so that their figures stay comparable. Sized so a run takes seconds to
# a minute.
scenario_flags() { # scenario sessions
    case $1 in
        broadcast) echo "--broadcasts 20" ;;
        unicast) echo "--notifies $(($2 * 2 > 20000 ? $2 * 2 : 20000)) --concurrency 16" ;;
        churn) echo "--notifies 10000 --churn-rate 200" ;;
        idle) echo "--idle-secs 10" ;;
    esac
}

# pushload worker processes for a size: one holds at most 10,000 sessions (the open-files
# cap is 20,000 per process).
workers_for() { # sessions
    echo $(($1 > 10000 ? 2 : 1))
}
