#!/bin/sh
# The log producer of scripts/bench.sh, the same for every tool compared:
# prints LINES lines of 60 bytes (newline included) as fast as it can,
#   P<id> <7-digit sequence> the-quick-brown-fox-jumps-over-the-lazy-dog-0123
# with <id> from the second argument, else $TASKHERD_GROUP_ID (taskherd
# gives it to every instance).
#
#   producer.sh LINES [ID]
exec mawk -v n="${1:?lines}" -v id="${2:-${TASKHERD_GROUP_ID:?id}}" 'BEGIN {
    for (i = 1; i <= n; i++)
        printf "P%d %07d the-quick-brown-fox-jumps-over-the-lazy-dog-0123\n", id, i
}'
