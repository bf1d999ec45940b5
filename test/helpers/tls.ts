/**
 * Test helper: a self-signed certificate made by openssl (a real key pair, real X.509), for
 * STARTTLS and implicit TLS on loopback.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface TestCert {
  readonly key: string;
  readonly cert: string;
}

/** A fresh self-signed certificate for `name` (CN and subjectAltName), PEM strings. */
export function selfSignedCert(name = 'mx.test'): TestCert {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dovetail-cert-'));
  try {
    const key = path.join(dir, 'key.pem');
    const cert = path.join(dir, 'cert.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${name}`, '-addext', `subjectAltName=DNS:${name}`], {
      stdio: 'ignore',
    });
    return { key: fs.readFileSync(key, 'utf8'), cert: fs.readFileSync(cert, 'utf8') };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
