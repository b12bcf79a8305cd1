//! Every CUDA kernel source compiles with NVRTC, as the `cuda` build does at
//! run time, for each GPU generation we support (Ampere sm_80/86, Ada sm_89,
//! Hopper sm_90), and defines every kernel the forwards launch. It needs no
//! GPU and no `cuda` feature: only NVRTC's libraries, from the PyPI wheel
//! that `scripts/cuda-toolkit --nvrtc` installs (`.ci/run` does, and sets
//! `SDGEN_NVRTC_LIB` to their folder).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;

use libloading::{Library, Symbol};
use sdgen::ops::cuda::{nvrtc_options, SOURCES};

const ARCHES: [(i32, i32); 4] = [(8, 0), (8, 6), (8, 9), (9, 0)];

type Program = *mut c_void;

struct Nvrtc {
    _builtins: Library,
    lib: Library,
}

impl Nvrtc {
    fn open() -> Self {
        // `scripts/cuda-toolkit --nvrtc`'s default folder, unless told another.
        let dir = std::env::var_os("SDGEN_NVRTC_LIB").map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            home.join(".cache/sdgen-cuda13/site/nvidia/cu13/lib")
        });
        assert!(
            dir.join("libnvrtc.so.13").is_file(),
            "no NVRTC in {}: run `export SDGEN_NVRTC_LIB=$(scripts/cuda-toolkit --nvrtc)` (as .ci/run does)",
            dir.display()
        );
        // libnvrtc opens its builtins library by name; loaded first from the
        // wheel's folder, it is found without a loader path.
        let open = |name: &str| {
            // SAFETY: NVIDIA's libraries run no unsound initialisers.
            unsafe { Library::new(dir.join(name)) }.unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
        };
        Self { _builtins: open("libnvrtc-builtins.so.13.0"), lib: open("libnvrtc.so.13") }
    }

    fn sym<T>(&self, name: &[u8]) -> Symbol<'_, T> {
        // SAFETY: the types below are NVRTC's C signatures.
        unsafe { self.lib.get(name) }.expect("an NVRTC symbol")
    }

    /// Compiles `code` with `options`; the PTX, or the compile log.
    fn compile(&self, name: &str, code: &str, options: &[String]) -> Result<String, String> {
        type Create = unsafe extern "C" fn(
            *mut Program,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> c_int;
        type Compile = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
        type Size = unsafe extern "C" fn(Program, *mut usize) -> c_int;
        type Text = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
        type Destroy = unsafe extern "C" fn(*mut Program) -> c_int;
        let (code, name) = (CString::new(code).unwrap(), CString::new(name).unwrap());
        let options: Vec<CString> = options.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
        let pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let text = |size: Symbol<Size>, get: Symbol<Text>, prog: Program| {
            let mut n = 0usize;
            let mut buf = vec![0 as c_char; 1];
            // SAFETY: the buffer is sized by NVRTC's own count.
            unsafe {
                assert_eq!(size(prog, &mut n), 0);
                buf.resize(n.max(1), 0);
                assert_eq!(get(prog, buf.as_mut_ptr()), 0);
                CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
            }
        };
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: NVRTC's documented calling sequence, with live C strings.
        unsafe {
            let rc = self.sym::<Create>(b"nvrtcCreateProgram")(
                &mut prog,
                code.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            assert_eq!(rc, 0, "nvrtcCreateProgram");
            let rc = self.sym::<Compile>(b"nvrtcCompileProgram")(prog, pointers.len() as c_int, pointers.as_ptr());
            let result = if rc == 0 {
                Ok(text(self.sym(b"nvrtcGetPTXSize"), self.sym(b"nvrtcGetPTX"), prog))
            } else {
                Err(text(self.sym(b"nvrtcGetProgramLogSize"), self.sym(b"nvrtcGetProgramLog"), prog))
            };
            self.sym::<Destroy>(b"nvrtcDestroyProgram")(&mut prog);
            result
        }
    }
}

#[test]
fn every_kernel_source_compiles_for_every_supported_gpu() {
    let nvrtc = Nvrtc::open();
    let mut failures = Vec::new();
    for source in SOURCES {
        for (major, minor) in ARCHES {
            match nvrtc.compile(source.module, source.code, &nvrtc_options(major, minor)) {
                Ok(ptx) => {
                    for entry in source.entries {
                        if !ptx.contains(&format!(".entry {entry}(")) {
                            failures.push(format!("{} sm_{major}{minor}: no kernel {entry}", source.module));
                        }
                    }
                }
                Err(log) => failures.push(format!("{} sm_{major}{minor}:\n{log}", source.module)),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_syntax_error_fails_the_compile() {
    let nvrtc = Nvrtc::open();
    let log = nvrtc.compile("broken", "extern \"C\" __global__ void k() { int x = ; }", &nvrtc_options(9, 0));
    assert!(log.is_err_and(|l| l.contains("error")));
}
