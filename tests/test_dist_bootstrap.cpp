// Bootstrap from each launcher's environment (torchrun, moetune launch, Open MPI, PMI,
// Slurm, none), the errors that name the bad variable, Slurm host lists, device choice and
// the timeout variable. Environments are maps handed to detect_process_info, so the tests
// never touch the real environment.
#include <gtest/gtest.h>

#include <map>

#include "core/error.h"
#include "dist/bootstrap.h"

namespace moetune::dist {
namespace {

EnvLookup env_of(std::map<std::string, std::string> values) {
  return [values = std::move(values)](std::string_view name) -> std::optional<std::string> {
    auto found = values.find(std::string(name));
    if (found == values.end()) return std::nullopt;
    return found->second;
  };
}

// The message of the Error `detect_process_info(env)` throws ("" when it does not).
std::string error_of(std::map<std::string, std::string> values) {
  try {
    detect_process_info(env_of(std::move(values)));
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(DistBootstrap, SingleProcessWhenNothingIsSet) {
  ProcessInfo info = detect_process_info(env_of({{"PATH", "/bin"}}));
  EXPECT_EQ(info.rank, 0);
  EXPECT_EQ(info.world_size, 1);
  EXPECT_EQ(info.local_rank, 0);
  EXPECT_FALSE(info.distributed());
  EXPECT_EQ(info.source, "single process");
}

TEST(DistBootstrap, Torchrun) {
  ProcessInfo info = detect_process_info(env_of({{"RANK", "5"},
                                                 {"WORLD_SIZE", "8"},
                                                 {"LOCAL_RANK", "1"},
                                                 {"LOCAL_WORLD_SIZE", "4"},
                                                 {"MASTER_ADDR", "node7"},
                                                 {"MASTER_PORT", "1234"},
                                                 {"TORCHELASTIC_RUN_ID", "none"}}));
  EXPECT_EQ(info.rank, 5);
  EXPECT_EQ(info.world_size, 8);
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_EQ(info.local_world_size, 4);
  EXPECT_EQ(info.master_addr, "node7");
  EXPECT_EQ(info.master_port, 1234);
  EXPECT_EQ(info.source, "torchrun");
  EXPECT_NE(info.describe().find("rank 5/8"), std::string::npos);
}

TEST(DistBootstrap, MoetuneLaunchAndDefaults) {
  ProcessInfo info = detect_process_info(env_of({{"RANK", "2"},
                                                 {"WORLD_SIZE", "3"},
                                                 {"LOCAL_RANK", "2"},
                                                 {"MASTER_ADDR", "127.0.0.1"},
                                                 {"MOETUNE_LAUNCH", "1"}}));
  EXPECT_EQ(info.source, "moetune launch");
  EXPECT_EQ(info.local_world_size, 3);  // defaults to one node
  EXPECT_EQ(info.master_port, kDefaultMasterPort);
}

TEST(DistBootstrap, RankVariablesTakePrecedenceOverSlurm) {
  // moetune launch or torchrun inside an sbatch job: the launcher's variables win.
  ProcessInfo info = detect_process_info(env_of({{"RANK", "1"},
                                                 {"WORLD_SIZE", "2"},
                                                 {"LOCAL_RANK", "1"},
                                                 {"MASTER_ADDR", "a"},
                                                 {"SLURM_PROCID", "0"},
                                                 {"SLURM_NTASKS", "1"},
                                                 {"SLURM_LOCALID", "0"}}));
  EXPECT_EQ(info.rank, 1);
  EXPECT_EQ(info.world_size, 2);
}

TEST(DistBootstrap, OpenMpi) {
  ProcessInfo info = detect_process_info(env_of({{"OMPI_COMM_WORLD_RANK", "3"},
                                                 {"OMPI_COMM_WORLD_SIZE", "4"},
                                                 {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                                 {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                                                 {"MASTER_ADDR", "head"}}));
  EXPECT_EQ(info.rank, 3);
  EXPECT_EQ(info.world_size, 4);
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_EQ(info.local_world_size, 2);
  EXPECT_EQ(info.source, "Open MPI (mpirun)");
  // mpirun gives no rendezvous address: MASTER_ADDR is required.
  std::string message = error_of({{"OMPI_COMM_WORLD_RANK", "0"},
                                  {"OMPI_COMM_WORLD_SIZE", "2"},
                                  {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}});
  EXPECT_NE(message.find("MASTER_ADDR"), std::string::npos) << message;
}

TEST(DistBootstrap, Pmi) {
  ProcessInfo info = detect_process_info(env_of({{"PMI_RANK", "1"},
                                                 {"PMI_SIZE", "2"},
                                                 {"MPI_LOCALRANKID", "1"},
                                                 {"MPI_LOCALNRANKS", "2"},
                                                 {"MASTER_ADDR", "h"}}));
  EXPECT_EQ(info.rank, 1);
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_EQ(info.local_world_size, 2);
  EXPECT_NE(error_of({{"PMI_RANK", "1"}, {"PMI_SIZE", "2"}, {"MASTER_ADDR", "h"}})
                .find("MPI_LOCALRANKID"),
            std::string::npos);
}

TEST(DistBootstrap, Slurm) {
  ProcessInfo info = detect_process_info(env_of({{"SLURM_PROCID", "6"},
                                                 {"SLURM_NTASKS", "8"},
                                                 {"SLURM_LOCALID", "2"},
                                                 {"SLURM_TASKS_PER_NODE", "4(x2)"},
                                                 {"SLURM_JOB_NODELIST", "gpu[07-08]"},
                                                 {"SLURM_JOB_ID", "123456"}}));
  EXPECT_EQ(info.rank, 6);
  EXPECT_EQ(info.world_size, 8);
  EXPECT_EQ(info.local_rank, 2);
  EXPECT_EQ(info.local_world_size, 4);
  EXPECT_EQ(info.master_addr, "gpu07");
  EXPECT_EQ(info.master_port, 20000 + 123456 % 20000);
  EXPECT_EQ(info.source, "Slurm (srun)");
  // Explicit MASTER_ADDR/MASTER_PORT win; the step's task count wins over the job's.
  info = detect_process_info(env_of({{"SLURM_PROCID", "0"},
                                     {"SLURM_NTASKS", "8"},
                                     {"SLURM_STEP_NUM_TASKS", "2"},
                                     {"SLURM_LOCALID", "0"},
                                     {"SLURM_JOB_NODELIST", "gpu[07-08]"},
                                     {"MASTER_ADDR", "other"},
                                     {"MASTER_PORT", "4000"}}));
  EXPECT_EQ(info.world_size, 2);
  EXPECT_EQ(info.master_addr, "other");
  EXPECT_EQ(info.master_port, 4000);
}

TEST(DistBootstrap, ErrorsNameTheVariable) {
  auto expect_error = [](std::map<std::string, std::string> env, const std::string& needle) {
    std::string message = error_of(std::move(env));
    EXPECT_NE(message.find(needle), std::string::npos) << "message: '" << message << "'";
  };
  expect_error({{"RANK", "4"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "a"}},
               "RANK=4 is not below WORLD_SIZE=4");
  expect_error({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}}, "MASTER_ADDR");
  expect_error({{"RANK", "x"}, {"WORLD_SIZE", "2"}}, "RANK='x'");
  expect_error({{"RANK", "1 "}, {"WORLD_SIZE", "2"}}, "RANK='1 '");
  expect_error({{"RANK", "-1"}, {"WORLD_SIZE", "2"}}, "RANK='-1'");
  expect_error({{"RANK", "0"}, {"WORLD_SIZE", "99999999999"}}, "WORLD_SIZE='99999999999'");
  expect_error({{"RANK", "0"}, {"WORLD_SIZE", "0"}}, "WORLD_SIZE=0");
  expect_error({{"RANK", "0"}}, "WORLD_SIZE is not");
  expect_error({{"WORLD_SIZE", "2"}}, "RANK is not");
  expect_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "a"}}, "LOCAL_RANK");
  expect_error({{"RANK", "0"},
                {"WORLD_SIZE", "2"},
                {"LOCAL_RANK", "2"},
                {"LOCAL_WORLD_SIZE", "2"},
                {"MASTER_ADDR", "a"}},
               "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2");
  expect_error({{"RANK", "0"},
                {"WORLD_SIZE", "2"},
                {"LOCAL_RANK", "0"},
                {"MASTER_ADDR", "a"},
                {"MASTER_PORT", "70000"}},
               "MASTER_PORT=70000");
  expect_error({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"}},
               "SLURM_PROCID=3 is not below SLURM_NTASKS=2");
  expect_error({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}}, "SLURM_LOCALID");
}

TEST(DistBootstrap, SlurmHostLists) {
  EXPECT_EQ(first_slurm_host("node[03-05,9],gpu1"), "node03");
  EXPECT_EQ(first_slurm_host("gpu-a1,gpu-a2"), "gpu-a1");
  EXPECT_EQ(first_slurm_host("rack[2-3]-n[10,12]"), "rack2-n10");
  EXPECT_EQ(first_slurm_host("single"), "single");
  EXPECT_THROW(first_slurm_host("bad[1-2"), Error);
  EXPECT_THROW(first_slurm_host(""), Error);
}

TEST(DistBootstrap, CudaDeviceChoice) {
  ProcessInfo info;
  info.rank = 5;
  info.local_rank = 1;
  EXPECT_EQ(choose_cuda_device(info, 8), 1);
  EXPECT_EQ(choose_cuda_device(info, 1), 0);  // one GPU per task (CUDA_VISIBLE_DEVICES)
  info.local_rank = 3;
  EXPECT_THROW(choose_cuda_device(info, 2), Error);
  EXPECT_THROW(choose_cuda_device(info, 0), Error);
}

TEST(DistBootstrap, TimeoutVariable) {
  EXPECT_EQ(dist_timeout_seconds(env_of({})), 300.0);
  EXPECT_EQ(dist_timeout_seconds(env_of({{"MOETUNE_DIST_TIMEOUT_S", "2.5"}})), 2.5);
  for (const char* bad : {"", "0", "-1", "abc", "5s", "nan", "inf"})
    EXPECT_THROW(dist_timeout_seconds(env_of({{"MOETUNE_DIST_TIMEOUT_S", bad}})), Error) << bad;
}

}  // namespace
}  // namespace moetune::dist
