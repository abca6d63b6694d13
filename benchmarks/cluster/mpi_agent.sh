#!/bin/sh
# Open MPI's remote-start agent for the cluster (mpirun --mca plm_rsh_agent THIS), instead of ssh:
# "mpi_agent.sh HOST COMMAND..." runs COMMAND inside the namespace of HOST. HSQ_MPI_HOSTS names a
# file of "ADDRESS NAMESPACE" lines written by the harness; any other host is refused.
host="$1"
shift
namespace=$(awk -v host="$host" '$1 == host {print $2}' "$HSQ_MPI_HOSTS")
if [ -z "$namespace" ]; then
  echo "mpi_agent.sh: refusing $host: not a host of this cluster ($HSQ_MPI_HOSTS)" >&2
  exit 1
fi
exec ip netns exec "$namespace" sh -c "$*"
