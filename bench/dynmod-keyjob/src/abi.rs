//! The few pieces of Envoy's dynamic-module C ABI this module uses, declared by hand.
//!
//! Envoy 1.40.0 (`envoy.filters.http.dynamic_modules`) loads the module with dlopen, calls
//! `envoy_dynamic_module_on_program_init` (which returns the ABI version string), then resolves
//! the HTTP filter's event hooks by name; the module calls back into Envoy through the
//! `envoy_dynamic_module_callback_*` functions the Envoy executable exports. The names and C
//! types below follow `source/extensions/dynamic_modules/abi/abi.h` (see README.md for the
//! exact revision and how it was checked against the 1.40.0 binary).
//!
//! C enums are passed and returned as `u32` (an `int`-sized enum in the x86-64 / aarch64 C
//! ABIs); only the values used here are named.

use std::ffi::{c_char, c_void};

/// `ENVOY_DYNAMIC_MODULES_ABI_VERSION` of Envoy 1.40.0 (the string its binary compares
/// against; a mismatch only logs a warning).
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl EnvoyBuffer {
    pub const NULL: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };

    /// The bytes, or an empty slice for a null buffer.
    ///
    /// # Safety
    /// The buffer must be valid (Envoy guarantees it until the end of the current hook, or
    /// until the next setter call).
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.length)
        }
    }
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl ModuleBuffer {
    pub const NULL: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };

    pub const fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: bytes.as_ptr().cast::<c_char>(),
            length: bytes.len(),
        }
    }
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
pub struct ModuleHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header` (only in hook signatures this module ignores).
#[repr(C)]
pub struct EnvoyHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

/// `envoy_dynamic_module_type_http_filter_config_envoy_ptr`.
pub type HttpFilterConfigEnvoyPtr = *mut c_void;
/// `envoy_dynamic_module_type_http_filter_config_module_ptr`.
pub type HttpFilterConfigModulePtr = *const c_void;
/// `envoy_dynamic_module_type_http_filter_envoy_ptr`.
pub type HttpFilterEnvoyPtr = *mut c_void;
/// `envoy_dynamic_module_type_http_filter_module_ptr`.
pub type HttpFilterModulePtr = *const c_void;
/// `envoy_dynamic_module_type_abi_version_module_ptr`.
pub type AbiVersionModulePtr = *const c_char;

/// `envoy_dynamic_module_type_http_header_type`.
pub type HeaderType = u32;
pub const REQUEST_HEADER: HeaderType = 0;
pub const RESPONSE_HEADER: HeaderType = 2;

/// `envoy_dynamic_module_type_attribute_id`.
pub type AttributeId = u32;
/// `envoy_dynamic_module_type_attribute_id_SourceAddress` (`source.address`, "ip:port").
pub const ATTRIBUTE_SOURCE_ADDRESS: AttributeId = 24;

/// `envoy_dynamic_module_type_log_level`.
pub type LogLevel = u32;
pub const LOG_ERROR: LogLevel = 4;

/// `envoy_dynamic_module_type_on_http_filter_{request,response}_{headers,body,trailers}_status`:
/// `*_Continue` is 0 in each; `*_StopIteration` is 1 for headers and trailers.
pub type FilterStatus = u32;
pub const CONTINUE: FilterStatus = 0;
pub const STOP_ITERATION: FilterStatus = 1;

/// `envoy_dynamic_module_type_http_callout_result` (ignored).
pub type HttpCalloutResult = u32;
/// `envoy_dynamic_module_type_http_stream_reset_reason` (ignored).
pub type HttpStreamResetReason = u32;

extern "C" {
    /// Value `index` of header `key` in the map `header_type` (null buffer if absent);
    /// `optional_size` receives the number of values for `key`.
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        header_type: HeaderType,
        key: ModuleBuffer,
        result_buffer: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    /// Replaces every value of `key` with `value`; a null `value` removes the header.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        header_type: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    /// A local reply (Envoy's sendLocalReply).
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        status_code: u32,
        headers_vector: *mut ModuleHttpHeader,
        headers_vector_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    /// A string attribute of the stream (here `source.address`).
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        attribute_id: AttributeId,
        result: *mut EnvoyBuffer,
    ) -> bool;

    /// A line in Envoy's log under the `dynamic_modules` logger.
    pub fn envoy_dynamic_module_callback_log(level: LogLevel, message: ModuleBuffer);
}
