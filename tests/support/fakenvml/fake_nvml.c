/*
 * A fake libnvidia-ml.so.1 for tests: the real NVML ABI (compiled against NVIDIA's nvml.h, so every
 * signature and struct layout is checked by the compiler), answering from a configuration file.
 *
 * Build:  cc -shared -fPIC -o libnvidia-ml.so.1 -I <dir of nvml.h> fake_nvml.c
 *         add -DFAKE_MINIMAL to leave out every optional function (pynvml then raises
 *         NVMLError_FunctionNotFound for them, as with an old driver).
 * Use:    LD_LIBRARY_PATH=<dir of the .so> FAKE_NVML_CONFIG=<file> python ...
 *
 * The configuration is line based (tests/support/fakenvml/__init__.py writes it from a dict); '#' starts a
 * comment. It is read again by every nvmlInit and nvmlDeviceGetCount, so a test can change it
 * between two collects.
 *
 *   driver 550.54.15                   nvmlSystemGetDriverVersion
 *   cuda 12040                         nvmlSystemGetCudaDriverVersion
 *   init_error 9                       nvmlInit fails with this code
 *   absent nvmlDeviceGetNumaNodeId     the function returns NVML_ERROR_FUNCTION_NOT_FOUND
 *   gpus 2                             number of GPUs (resets them)
 *   gpu I name TEXT...                 the rest of the line
 *   gpu I uuid GPU-...
 *   gpu I pci 00000000:18:00.0
 *   gpu I memory TOTAL USED RESERVED   bytes; v1 memory info reports used+reserved as used
 *   gpu I util PERCENT
 *   gpu I temp CELSIUS
 *   gpu I power DRAW_MW LIMIT_MW
 *   gpu I mig CURRENT                  0 or 1
 *   gpu I ecc CORRECTED UNCORRECTED
 *   gpu I numa NODE
 *   gpu I affinity HEX[,HEX...]        64-bit words of the CPU mask, lowest first
 *   gpu I nvlink BUSID|-               one line per link; '-' = inactive; a bus id that is no GPU's
 *                                      is an NVSwitch
 *   gpu I process compute|graphics PID BYTES|-
 *   gpu I not_supported FUNCTION       NVML_ERROR_NOT_SUPPORTED from FUNCTION on this GPU
 *   gpu I fail FUNCTION CODE           FUNCTION fails with CODE on this GPU
 *   gpu I fail_all CODE                every call on this GPU fails with CODE (e.g. 15 GPU_IS_LOST)
 *   gpu I fail_handle CODE             nvmlDeviceGetHandleByIndex fails with CODE
 *   gpu I xid CODE                     one critical-XID event (nvmlEventSetWait_v2); each line is
 *                                      delivered once per process, in order, so a test appends lines
 *                                      to inject more (events are not registered: NOT_SUPPORTED
 *                                      via "not_supported nvmlDeviceRegisterEvents")
 *   topo I J LEVEL                     nvmlDeviceGetTopologyCommonAncestor (symmetric)
 *
 * FUNCTION names are the C symbols, with or without the version suffix (nvmlDeviceGetPciInfo or
 * nvmlDeviceGetPciInfo_v3).
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <nvml.h>

#define MAX_GPUS 16
#define MAX_PROCS 32
#define MAX_FNS 64
#define FN_LEN 80
#define MAX_AFFINITY_WORDS 16
#define MAX_XIDS 64
#define MAX_EVENT_SETS 64

struct fake_proc {
    unsigned int pid;
    unsigned long long memory;
    int unknown_memory;
    int graphics;
};

struct nvmlDevice_st {
    int index;
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    char pci[NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
    unsigned long long memory_total, memory_used, memory_reserved;
    unsigned int util, temp, power, power_limit, mig;
    unsigned long long ecc[2];
    int numa;
    unsigned long affinity[MAX_AFFINITY_WORDS];
    int links;
    char link_remote[NVML_NVLINK_MAX_LINKS][NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
    struct fake_proc procs[MAX_PROCS];
    int nprocs;
    char not_supported[MAX_FNS][FN_LEN];
    int n_not_supported;
    char failing[MAX_FNS][FN_LEN];
    nvmlReturn_t fail_code[MAX_FNS];
    int n_failing;
    nvmlReturn_t fail_all;
    nvmlReturn_t fail_handle;
    unsigned long long xids[MAX_XIDS];
    int nxids;
};

struct nvmlEventSet_st {
    int used;
    unsigned long long types[MAX_GPUS]; /* registered event types, by GPU index */
};

static struct nvmlEventSet_st event_sets[MAX_EVENT_SETS];
/* XID lines already delivered, by GPU index: survives re-reading the configuration. */
static int xids_delivered[MAX_GPUS];

static struct nvmlDevice_st gpus[MAX_GPUS];
static int ngpus;
static char driver_version[NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE];
static int cuda_version;
static nvmlReturn_t init_error;
static char absent[MAX_FNS][FN_LEN];
static int n_absent;
static int topo[MAX_GPUS][MAX_GPUS];
static int initialized;

static void copy(char *dst, size_t size, const char *src) {
    snprintf(dst, size, "%s", src);
}

static void reset(void) {
    memset(gpus, 0, sizeof gpus);
    ngpus = 0;
    driver_version[0] = 0;
    cuda_version = 0;
    init_error = NVML_SUCCESS;
    n_absent = 0;
    for (int i = 0; i < MAX_GPUS; i++) {
        gpus[i].index = i;
        gpus[i].numa = -1;
        for (int j = 0; j < MAX_GPUS; j++)
            topo[i][j] = -1;
    }
}

static char *trim(char *s) {
    while (isspace((unsigned char)*s))
        s++;
    char *end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        *--end = 0;
    return s;
}

static void parse_gpu_line(struct nvmlDevice_st *g, const char *key, char *rest) {
    char a[FN_LEN] = "", b[FN_LEN] = "";
    unsigned long long x = 0, y = 0, z = 0;
    if (!strcmp(key, "name")) {
        copy(g->name, sizeof g->name, rest);
    } else if (!strcmp(key, "uuid")) {
        copy(g->uuid, sizeof g->uuid, rest);
    } else if (!strcmp(key, "pci")) {
        copy(g->pci, sizeof g->pci, rest);
    } else if (!strcmp(key, "memory")) {
        sscanf(rest, "%llu %llu %llu", &x, &y, &z);
        g->memory_total = x, g->memory_used = y, g->memory_reserved = z;
    } else if (!strcmp(key, "util")) {
        g->util = (unsigned int)strtoul(rest, NULL, 10);
    } else if (!strcmp(key, "temp")) {
        g->temp = (unsigned int)strtoul(rest, NULL, 10);
    } else if (!strcmp(key, "power")) {
        sscanf(rest, "%llu %llu", &x, &y);
        g->power = (unsigned int)x, g->power_limit = (unsigned int)y;
    } else if (!strcmp(key, "mig")) {
        g->mig = (unsigned int)strtoul(rest, NULL, 10);
    } else if (!strcmp(key, "ecc")) {
        sscanf(rest, "%llu %llu", &x, &y);
        g->ecc[0] = x, g->ecc[1] = y;
    } else if (!strcmp(key, "numa")) {
        g->numa = (int)strtol(rest, NULL, 10);
    } else if (!strcmp(key, "affinity")) {
        int w = 0;
        for (char *tok = strtok(rest, ","); tok && w < MAX_AFFINITY_WORDS; tok = strtok(NULL, ","))
            g->affinity[w++] = strtoul(tok, NULL, 16);
    } else if (!strcmp(key, "nvlink")) {
        if (g->links < NVML_NVLINK_MAX_LINKS)
            copy(g->link_remote[g->links++], NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE, rest);
    } else if (!strcmp(key, "process")) {
        if (g->nprocs < MAX_PROCS && sscanf(rest, "%79s %llu %79s", a, &x, b) == 3) {
            struct fake_proc *p = &g->procs[g->nprocs++];
            p->graphics = !strcmp(a, "graphics");
            p->pid = (unsigned int)x;
            p->unknown_memory = !strcmp(b, "-");
            p->memory = p->unknown_memory ? 0 : strtoull(b, NULL, 10);
        }
    } else if (!strcmp(key, "not_supported")) {
        if (g->n_not_supported < MAX_FNS)
            copy(g->not_supported[g->n_not_supported++], FN_LEN, rest);
    } else if (!strcmp(key, "fail")) {
        if (g->n_failing < MAX_FNS && sscanf(rest, "%79s %llu", a, &x) == 2) {
            copy(g->failing[g->n_failing], FN_LEN, a);
            g->fail_code[g->n_failing++] = (nvmlReturn_t)x;
        }
    } else if (!strcmp(key, "fail_all")) {
        g->fail_all = (nvmlReturn_t)strtoul(rest, NULL, 10);
    } else if (!strcmp(key, "fail_handle")) {
        g->fail_handle = (nvmlReturn_t)strtoul(rest, NULL, 10);
    } else if (!strcmp(key, "xid")) {
        if (g->nxids < MAX_XIDS)
            g->xids[g->nxids++] = strtoull(rest, NULL, 10);
    } else {
        fprintf(stderr, "fake NVML: unknown GPU setting %s\n", key);
    }
}

/* Returns 0 when the configuration was read. */
static int load_config(void) {
    const char *path = getenv("FAKE_NVML_CONFIG");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) {
        fprintf(stderr, "fake NVML: cannot read FAKE_NVML_CONFIG=%s\n", path ? path : "(unset)");
        return -1;
    }
    reset();
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash)
            *hash = 0;
        char *s = trim(line);
        char key[FN_LEN] = "";
        int n = 0;
        if (!*s || sscanf(s, "%79s %n", key, &n) < 1)
            continue;
        char *rest = trim(s + n);
        if (!strcmp(key, "driver")) {
            copy(driver_version, sizeof driver_version, rest);
        } else if (!strcmp(key, "cuda")) {
            cuda_version = (int)strtol(rest, NULL, 10);
        } else if (!strcmp(key, "init_error")) {
            init_error = (nvmlReturn_t)strtoul(rest, NULL, 10);
        } else if (!strcmp(key, "absent")) {
            if (n_absent < MAX_FNS)
                copy(absent[n_absent++], FN_LEN, rest);
        } else if (!strcmp(key, "gpus")) {
            ngpus = (int)strtol(rest, NULL, 10);
            if (ngpus < 0 || ngpus > MAX_GPUS)
                ngpus = 0;
        } else if (!strcmp(key, "gpu")) {
            int index = -1, m = 0;
            char sub[FN_LEN] = "";
            if (sscanf(rest, "%d %79s %n", &index, sub, &m) >= 2 && index >= 0 && index < MAX_GPUS)
                parse_gpu_line(&gpus[index], sub, trim(rest + m));
        } else if (!strcmp(key, "topo")) {
            int i = -1, j = -1, level = -1;
            if (sscanf(rest, "%d %d %d", &i, &j, &level) == 3 && i >= 0 && j >= 0 && i < MAX_GPUS && j < MAX_GPUS)
                topo[i][j] = topo[j][i] = level;
        } else {
            fprintf(stderr, "fake NVML: unknown setting %s\n", key);
        }
    }
    fclose(f);
    return 0;
}

/* "nvmlDeviceGetPciInfo_v3" matches "nvmlDeviceGetPciInfo_v3" and "nvmlDeviceGetPciInfo". */
static int names(const char *configured, const char *func) {
    if (!strcmp(configured, func))
        return 1;
    const char *v = strrchr(func, '_');
    return v && v[1] == 'v' && isdigit((unsigned char)v[2]) && strlen(configured) == (size_t)(v - func) &&
           !strncmp(configured, func, (size_t)(v - func));
}

static int listed(char list[][FN_LEN], int n, const char *func) {
    for (int i = 0; i < n; i++)
        if (names(list[i], func))
            return 1;
    return 0;
}

static nvmlReturn_t check(const char *func, nvmlDevice_t dev) {
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (listed(absent, n_absent, func))
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (!dev || dev < gpus || dev >= gpus + ngpus)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (dev->fail_all)
        return dev->fail_all;
    for (int i = 0; i < dev->n_failing; i++)
        if (names(dev->failing[i], func))
            return dev->fail_code[i];
    if (listed(dev->not_supported, dev->n_not_supported, func))
        return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

static nvmlReturn_t check_system(const char *func) {
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (listed(absent, n_absent, func))
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    return NVML_SUCCESS;
}

#define CHECK(dev)                                                                                                     \
    do {                                                                                                               \
        nvmlReturn_t rc_ = check(__func__, (dev));                                                                     \
        if (rc_ != NVML_SUCCESS)                                                                                       \
            return rc_;                                                                                                \
    } while (0)

#define CHECK_SYSTEM()                                                                                                 \
    do {                                                                                                               \
        nvmlReturn_t rc_ = check_system(__func__);                                                                     \
        if (rc_ != NVML_SUCCESS)                                                                                       \
            return rc_;                                                                                                \
    } while (0)

static void fill_pci(nvmlPciInfo_t *pci, const char *bus_id) {
    unsigned int domain = 0, bus = 0, device = 0;
    memset(pci, 0, sizeof *pci);
    sscanf(bus_id, "%x:%x:%x", &domain, &bus, &device);
    pci->domain = domain, pci->bus = bus, pci->device = device;
    pci->pciDeviceId = 0x233010DE;
    copy(pci->busId, sizeof pci->busId, bus_id);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT, domain & 0xffff, bus,
             device);
}

/* ---- library ------------------------------------------------------------------------------ */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    if (load_config() != 0)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    if (init_error)
        return init_error;
    initialized++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    return nvmlInitWithFlags(0);
}

nvmlReturn_t nvmlShutdown(void) {
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    initialized--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    CHECK_SYSTEM();
    if (!version || length < strlen(driver_version) + 1)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    copy(version, length, driver_version);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    CHECK_SYSTEM();
    if (!deviceCount)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (load_config() != 0)
        return NVML_ERROR_UNKNOWN;
    *deviceCount = (unsigned int)ngpus;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    CHECK_SYSTEM();
    if (!device || index >= (unsigned int)ngpus)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (gpus[index].fail_handle)
        return gpus[index].fail_handle;
    *device = &gpus[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    CHECK(device);
    if (!name || length < strlen(device->name) + 1)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    copy(name, length, device->name);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    CHECK(device);
    if (!uuid || length < strlen(device->uuid) + 1)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    copy(uuid, length, device->uuid);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    CHECK(device);
    if (!pci)
        return NVML_ERROR_INVALID_ARGUMENT;
    fill_pci(pci, device->pci);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    CHECK(device);
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* v1 counts the driver's reservation as used. */
    memory->total = device->memory_total;
    memory->used = device->memory_used + device->memory_reserved;
    memory->free = device->memory_total - memory->used;
    return NVML_SUCCESS;
}

/* ---- optional: missing from the FAKE_MINIMAL build, like functions of newer drivers ----------- */
#ifndef FAKE_MINIMAL

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion) {
    CHECK_SYSTEM();
    if (!cudaDriverVersion)
        return NVML_ERROR_INVALID_ARGUMENT;
    *cudaDriverVersion = cuda_version;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    CHECK(device);
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    memory->total = device->memory_total;
    memory->reserved = device->memory_reserved;
    memory->used = device->memory_used;
    memory->free = device->memory_total - device->memory_used - device->memory_reserved;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    CHECK(device);
    if (!utilization)
        return NVML_ERROR_INVALID_ARGUMENT;
    utilization->gpu = device->util;
    utilization->memory = device->util / 2;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensorType, unsigned int *temp) {
    CHECK(device);
    if (!temp || sensorType != NVML_TEMPERATURE_GPU)
        return NVML_ERROR_INVALID_ARGUMENT;
    *temp = device->temp;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    CHECK(device);
    if (!power)
        return NVML_ERROR_INVALID_ARGUMENT;
    *power = device->power;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit) {
    CHECK(device);
    if (!limit)
        return NVML_ERROR_INVALID_ARGUMENT;
    *limit = device->power_limit;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit) {
    CHECK(device);
    if (!limit)
        return NVML_ERROR_INVALID_ARGUMENT;
    *limit = device->power_limit;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode, unsigned int *pendingMode) {
    CHECK(device);
    if (!currentMode || !pendingMode)
        return NVML_ERROR_INVALID_ARGUMENT;
    *currentMode = *pendingMode = device->mig ? NVML_DEVICE_MIG_ENABLE : NVML_DEVICE_MIG_DISABLE;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, nvmlMemoryErrorType_t errorType,
                                         nvmlEccCounterType_t counterType, unsigned long long *eccCounts) {
    CHECK(device);
    if (!eccCounts || errorType >= NVML_MEMORY_ERROR_TYPE_COUNT || counterType >= NVML_ECC_COUNTER_TYPE_COUNT)
        return NVML_ERROR_INVALID_ARGUMENT;
    *eccCounts = device->ecc[errorType];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t device, unsigned int *node) {
    CHECK(device);
    if (!node)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->numa < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *node = (unsigned int)device->numa;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCpuAffinity(nvmlDevice_t device, unsigned int cpuSetSize, unsigned long *cpuSet) {
    CHECK(device);
    if (!cpuSet || cpuSetSize == 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < cpuSetSize; i++)
        cpuSet[i] = i < MAX_AFFINITY_WORDS ? device->affinity[i] : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, nvmlEnableState_t *isActive) {
    CHECK(device);
    if (!isActive || link >= NVML_NVLINK_MAX_LINKS)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->links == 0)
        return NVML_ERROR_NOT_SUPPORTED; /* a PCIe-only board */
    if (link >= (unsigned int)device->links)
        return NVML_ERROR_INVALID_ARGUMENT; /* past this GPU's own link count */
    *isActive = strcmp(device->link_remote[link], "-") ? NVML_FEATURE_ENABLED : NVML_FEATURE_DISABLED;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t device, unsigned int link, nvmlPciInfo_t *pci) {
    CHECK(device);
    if (!pci || link >= (unsigned int)device->links || !strcmp(device->link_remote[link], "-"))
        return NVML_ERROR_INVALID_ARGUMENT;
    fill_pci(pci, device->link_remote[link]);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetNvLinkRemoteDeviceType(nvmlDevice_t device, unsigned int link,
                                                 nvmlIntNvLinkDeviceType_t *pNvLinkDeviceType) {
    CHECK(device);
    if (!pNvLinkDeviceType || link >= (unsigned int)device->links || !strcmp(device->link_remote[link], "-"))
        return NVML_ERROR_INVALID_ARGUMENT;
    *pNvLinkDeviceType = NVML_NVLINK_DEVICE_TYPE_SWITCH;
    for (int i = 0; i < ngpus; i++)
        if (!strcasecmp(gpus[i].pci, device->link_remote[link]))
            *pNvLinkDeviceType = NVML_NVLINK_DEVICE_TYPE_GPU;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t device1, nvmlDevice_t device2,
                                                 nvmlGpuTopologyLevel_t *pathInfo) {
    CHECK(device1);
    CHECK(device2);
    if (!pathInfo)
        return NVML_ERROR_INVALID_ARGUMENT;
    int level = topo[device1->index][device2->index];
    if (level < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *pathInfo = (nvmlGpuTopologyLevel_t)level;
    return NVML_SUCCESS;
}

static nvmlReturn_t processes(nvmlDevice_t device, int graphics, unsigned int *infoCount, nvmlProcessInfo_t *infos) {
    if (!infoCount)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int n = 0;
    for (int i = 0; i < device->nprocs; i++)
        n += device->procs[i].graphics == graphics;
    if (!infos || *infoCount < n) {
        *infoCount = n;
        return n ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    }
    unsigned int k = 0;
    for (int i = 0; i < device->nprocs; i++) {
        const struct fake_proc *p = &device->procs[i];
        if (p->graphics != graphics)
            continue;
        infos[k].pid = p->pid;
        infos[k].usedGpuMemory = p->unknown_memory ? (unsigned long long)NVML_VALUE_NOT_AVAILABLE : p->memory;
        infos[k].gpuInstanceId = 0xFFFFFFFF;
        infos[k].computeInstanceId = 0xFFFFFFFF;
        k++;
    }
    *infoCount = k;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos) {
    CHECK(device);
    return processes(device, 0, infoCount, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                      nvmlProcessInfo_t *infos) {
    CHECK(device);
    return processes(device, 1, infoCount, infos);
}

/* ---- events --------------------------------------------------------------------------------- */

static int valid_set(nvmlEventSet_t set) {
    return set && set >= event_sets && set < event_sets + MAX_EVENT_SETS && set->used;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    CHECK_SYSTEM();
    if (!set)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < MAX_EVENT_SETS; i++) {
        if (!event_sets[i].used) {
            memset(&event_sets[i], 0, sizeof event_sets[i]);
            event_sets[i].used = 1;
            *set = &event_sets[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_MEMORY;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    CHECK_SYSTEM();
    if (!valid_set(set))
        return NVML_ERROR_INVALID_ARGUMENT;
    set->used = 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes) {
    CHECK(device);
    if (!eventTypes)
        return NVML_ERROR_INVALID_ARGUMENT;
    *eventTypes = listed(device->not_supported, device->n_not_supported, "nvmlDeviceRegisterEvents")
                      ? 0
                      : nvmlEventTypeXidCriticalError;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes, nvmlEventSet_t set) {
    CHECK(device);
    if (!valid_set(set))
        return NVML_ERROR_INVALID_ARGUMENT;
    if (eventTypes & ~(unsigned long long)nvmlEventTypeXidCriticalError)
        return NVML_ERROR_NOT_SUPPORTED; /* the fake only knows XIDs */
    set->types[device->index] |= eventTypes;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    (void)timeoutms; /* never blocks: nothing pending answers TIMEOUT at once */
    CHECK_SYSTEM();
    if (!valid_set(set) || !data)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < ngpus; i++) {
        if (!(set->types[i] & nvmlEventTypeXidCriticalError) || xids_delivered[i] >= gpus[i].nxids)
            continue;
        memset(data, 0, sizeof *data);
        data->device = &gpus[i];
        data->eventType = nvmlEventTypeXidCriticalError;
        data->eventData = gpus[i].xids[xids_delivered[i]++];
        data->gpuInstanceId = data->computeInstanceId = 0xFFFFFFFF;
        return NVML_SUCCESS;
    }
    return NVML_ERROR_TIMEOUT;
}

#endif /* FAKE_MINIMAL */
