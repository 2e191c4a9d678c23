/**
 * A persistent MQTT session keeps every subscription it ever made. After a
 * change of MQTT_TOPIC, channel or INGEST_SHARE_GROUP under the same client
 * id, the old subscription would go on delivering, and every message would
 * arrive twice. So the current topic filter is remembered beside the spool,
 * and the previous one is unsubscribed once the new one is in place.
 */

import type { MqttClient } from "mqtt";
import { join } from "node:path";
import { log } from "./log.ts";

const FILE = "subscription.json";

interface Remembered {
  clientId: string;
  topic: string;
}

/** Call once subscribed to `topic`: drops the previous filter of this client id, if any. */
export function replacePrevious(
  client: MqttClient,
  stateDir: string,
  clientId: string,
  topic: string,
): void {
  const path = join(stateDir, FILE);
  const previous = read(path);
  const remember = () => {
    try {
      Deno.writeTextFileSync(path, JSON.stringify({ clientId, topic }) + "\n");
    } catch (e) {
      log("warn", "cannot remember the subscription", { path, error: e });
    }
  };
  if (previous?.clientId !== clientId || previous.topic === topic) {
    if (previous?.clientId !== clientId) remember();
    return;
  }
  client.unsubscribe(previous.topic, (err) => {
    if (err) {
      log("warn", "cannot drop the previous subscription, trying again on reconnect", {
        topic: previous.topic,
        error: err.message,
      });
      return;
    }
    log("info", "dropped the previous subscription", { topic: previous.topic });
    remember();
  });
}

function read(path: string): Remembered | null {
  try {
    const v = JSON.parse(Deno.readTextFileSync(path));
    return typeof v?.clientId === "string" && typeof v?.topic === "string" ? v : null;
  } catch {
    return null;
  }
}
